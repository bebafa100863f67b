"""The message transports of PROTOCOL.md: framed MessagePack over raw TCP, and WebSocket."""
