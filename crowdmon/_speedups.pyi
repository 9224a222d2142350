# The compiled request path has the interface of its Python twin.
from crowdmon._core import ExchangeCore as ExchangeCore
from crowdmon._core import MiddlewareCore as MiddlewareCore
