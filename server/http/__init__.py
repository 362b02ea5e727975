"""The OpenAI-compatible HTTP front end: FastAPI routes over the shared request path
(:mod:`adapterctl.server.generation`), served by uvicorn on the gRPC server's event loop."""
