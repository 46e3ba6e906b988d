"""Launch the FLUID demo: ``python app.py`` (same options as ``fluid demo``).

Until the Gradio demo lands this prints how to generate from the command line.
"""

import sys

if __name__ == "__main__":
    print("The live demo is coming; meanwhile try:\n"
          "  fluid generate --model default --chat --prompt \"Tell me about the Moon.\"")
    sys.exit(0)
