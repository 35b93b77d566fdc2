"""Record: the runner's plain, read-only value objects (Plan, Volume, the mount operations).

dataclasses would cost ~10 ms of the runner's start-up; this is all they
would give here: keyword construction with defaults, equality, hashing, a
repr, and no assignment after construction.
"""


class Record:
    __slots__ = ()
    _defaults = {}

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError(f"unknown fields: {', '.join(sorted(unknown))}")
        for name in self.__slots__:
            object.__setattr__(self, name, values[name] if name in values
                               else self._defaults[name])

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def replace(self, **changes):
        """A copy with some fields changed (checked as a new record would be)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)

    def _values(self):
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self):
        return hash(self._values())

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"
