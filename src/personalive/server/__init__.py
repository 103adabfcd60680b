"""The online web page: `app` (gradio layout), `session` (per-tab stream state and queues), `worker` (engines)."""
