"""pqfed: post-quantum-secure federated learning for the Internet of Medical Things."""
__version__ = "0.1.0"
