"""Long-context training on Megatron-Core (see README.md)."""

import warnings

# Megatron-Core announces at import time that it falls back to torch implementations when
# Transformer Engine / Apex are absent. That is the expected state on CPU and is reported once by
# our own start-up line (which layer spec runs), so keep the logs readable.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
