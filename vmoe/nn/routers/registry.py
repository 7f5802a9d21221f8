"""The router registry: name -> `base.Router` subclass (`model.moe.router`).

Router modules register their class with `@registry.register('name')`; the
package `vmoe.nn.routers` imports every router module and re-exports
`get`, `names` and `default_options`. A `vmoe.nn.kinds.Registry`.
"""

from __future__ import annotations

from vmoe.nn import kinds

ROUTERS = kinds.Registry('router')

register = ROUTERS.register
get = ROUTERS.get
names = ROUTERS.names
default_options = ROUTERS.default_options
