"""The project's lab: what only our own measuring needs, not shipped in the wheel. The cell table and its one-command
runner (``cells``), the offline wheel folder for a lent GPU machine (``offline``), and the committed result folders
beside this package (``benchmarks/results``). It uses the library (``nnunet_semi.tools.benchmark``) like a user."""
