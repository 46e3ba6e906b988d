"""``fluid serve``: an OpenAI-compatible server whose requests share one continuous FLUID batch.

``engine`` (the decode thread), ``openai_api`` (request checks and response shapes) and
``app`` (the Starlette routes) are kept apart so that each has one job; only ``app`` and the
command import the web libraries.
"""
