"""The HTTP server: a plain ASGI application (no framework) and its runner."""
