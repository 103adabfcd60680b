"""The online web page: `app` (gradio layout), `session` (per-tab stream state), `pacing` (its bounded queues),
`video_feeder` (driving-video playback), `worker` (engines)."""
