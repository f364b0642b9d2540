"""`dsv3-run serve`: an OpenAI-compatible HTTP server over the engine (continuous batching, paged
latent cache, prefix caching, admission control). Needs the `serve` extra: pip install 'dsv3[serve]'.

    protocol  request schemas, error objects, response bodies (OpenAI wire format)
    worker    the engine thread and the per-request event queues
    app       the Starlette routes
    chat      a chat request's tools, tool_choice, response_format and template kwargs, planned
    chat_output, tool_parsers, reasoning   a chat answer read back into content, tool_calls, reasoning_content
    metrics   Prometheus metrics
    server    uvicorn in the foreground or in a thread
"""
