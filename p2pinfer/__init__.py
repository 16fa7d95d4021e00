"""p2pinfer: pool the devices on a network into one LLM server."""

__version__ = "0.1.0"
