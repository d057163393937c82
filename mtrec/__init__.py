"""Multi-task recommendation on TorchRec: data -> features -> model -> training -> metrics."""

import logging as _logging

# torchrec's import trips a one-time torch.fx notice ("is_fx_tracing will return true for both ...")
# that says nothing to a user of mtlib; keep warnings and errors from that logger.
_logging.getLogger("torch.fx._symbolic_trace").setLevel(_logging.ERROR)
