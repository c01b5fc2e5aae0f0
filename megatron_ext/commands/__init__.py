"""The project's command-line tools: one module per command, each with ``main(argv=None) -> int``.

Each is installed as a console command (``megatron-convert-checkpoint``, ...; see pyproject.toml)
and kept as ``tools/<name>.py`` for Megatron-LM habits. A user error prints
``<prog>: error: <message>`` and exits with status 2; anything else is a bug with its traceback.
"""
