"""Multi-task recommendation on TorchRec: data -> features -> model -> training -> metrics."""
