# The C module behind `signal`; mpeventfd calls its pthread_sigmask directly (design-review S6).
from collections.abc import Iterable

def pthread_sigmask(how: int, mask: Iterable[int], /) -> set[int]: ...
