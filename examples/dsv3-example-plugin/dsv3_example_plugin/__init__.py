"""An example dsv3 backend plugin (see README.md): backend `example`, and an rms_norm for `cpu`."""
__version__ = "0.1.0"
