"""`craft serve`: an OpenAI-compatible HTTP server over a checkpoint.

Layers: `protocol` (request validation, response and error JSON), `chat` (sandboxed chat
templates), `worker` (the thread that batches every request in flight through one
`craft.engine.DecodeEngine`), `app` (the Starlette routes) and `server` (loading the model,
binding the socket, running uvicorn). Needs the `serve` extra: `pip install craft-lm[serve]`.
"""
