"""The method's one error that a person can act on: what to lower when training does not fit."""


class TrainingDoesNotFit(Exception):
    """No way of calling the UNet for training fits in GPU memory; the message says what to lower."""
