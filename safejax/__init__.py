"""safejax: safety pretraining on JAX. Importing it keeps the native libraries' start-up logs
off the console (safejax/native_logs.py)."""

from safejax import native_logs as _native_logs

_native_logs.quiet()
