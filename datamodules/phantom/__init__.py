"""The embedded, offline phantom dataset: renderers, report writer and its datamodule."""
