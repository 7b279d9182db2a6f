"""Stage 3, serve: model folders in, an OpenAI-compatible endpoint out (Ray Serve LLM, one vLLM engine per model).

app.py    the Serve application, start/stop, Bearer auth, CPU core pinning
"""
