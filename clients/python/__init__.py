"""Python clients for LiveLM (TCP, WebSocket, HTTP/SSE)."""
