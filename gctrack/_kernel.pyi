FEATURE_WP_ASYNC: int
FEATURE_WP_UNPOPULATED: int

def uffd_features() -> int: ...
