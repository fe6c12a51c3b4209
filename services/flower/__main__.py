"""``python -m pqfed.services.flower exec|zygote ...`` (services/flower/launch.py)."""

from pqfed.services.flower.launch import main

main()
