"""One way for every stage to get a Ray: the given address, ``$RAY_ADDRESS`` (set inside ``ray job submit``),
or a private local Ray started for this process."""

from __future__ import annotations

import os

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_ray(address: str | None = None, *, log_to_driver: bool = True) -> bool:
    """Connect or start Ray unless already initialised; True when this call did (the caller owns shutdown).

    A locally started Ray gets this checkout on its workers' ``PYTHONPATH`` so an uninstalled checkout works.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        path = os.pathsep.join(p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
        ray.init(include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True
