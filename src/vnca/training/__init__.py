"""The pieces of training behind `vnca.train.train_and_evaluate` (see `vnca.train`)."""
