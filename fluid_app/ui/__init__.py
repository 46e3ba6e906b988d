"""The Gradio demo: watch FLUID denoise blocks live and race it against greedy AR.

``render`` turns sampler events into view state (pure, no Gradio); ``runner`` caches models
and drives one decode, or two side by side; ``app`` builds the ``gr.Blocks`` page. Gradio is
imported only by ``app``, so the rest of the package works without the ``demo`` extra.
"""
