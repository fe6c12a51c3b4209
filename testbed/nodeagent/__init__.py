"""Process-based node agent (a mini-kubelet) for the emulated Raspberry Pi testbed.

See README.md in this directory; entry point ``pqfed node-agent``.
"""
