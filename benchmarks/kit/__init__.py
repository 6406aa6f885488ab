"""The kit every protocol stands on: the protocol contract, the feature cache, label-fraction splits, the
trainable-head epoch loop and tensor image views."""
