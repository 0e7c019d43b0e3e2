"""The command-line tools, installed as ``ubicore.tools`` (the ``ubi`` command)."""
