# The compiled request path has the interface of its Python twin.
from crowdmon._core import ExchangeCore as ExchangeCore
from crowdmon._core import MiddlewareCore as MiddlewareCore

def absorb(
    batch: list[tuple[object, str, object, float, int, int]],
    known: dict[tuple[object, str, object], tuple[list[float], bool]],
    duration_bounds: tuple[float, ...],
    size_bounds: tuple[float, ...],
    offsets: tuple[int, int, int],
) -> tuple[list[tuple[object, str, object, float, int, int]], dict[str, int]]: ...

class MiddlewareCall:
    """What the compiled ``MiddlewareCore.__call__`` returns: awaitable, and a coroutine to asyncio."""

    def __await__(self) -> MiddlewareCall: ...
    def __next__(self) -> object: ...
    def send(self, value: object) -> object: ...
    def throw(self, *args: object) -> object: ...
    def close(self) -> None: ...
