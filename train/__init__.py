"""Group building, losses, trainer glue and evaluation."""
