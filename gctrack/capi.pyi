from typing import Any

_C_API: Any  # PyCapsule "gctrack._C_API"; see gctrack/gctrack.h
