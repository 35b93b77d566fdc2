"""The subordinate-id rules of a rootless run (runner.subids), without a namespace."""
import pytest

from runner.subids import id_map, parse_ranges

SUBUID = """\
alice:100000:65536
# a comment line is no owner
bob:165536:65536
1001:231072:1000
alice:300000:10
broken:line
carol:x:5
dave:400000:0
"""


@pytest.mark.parametrize("name, number, expected", [
    ("alice", 1000, [(100000, 65536), (300000, 10)]),   # every range, in file order
    ("bob", 1002, [(165536, 65536)]),
    ("erin", 1001, [(231072, 1000)]),                  # the owner given by number
    ("carol", 1003, []),                               # a malformed start is no range
    ("dave", 1004, []),                                # nor is an empty one
    ("mallory", 2000, []),
])
def test_ranges_of_a_user(name, number, expected):
    assert parse_ranges(SUBUID, name, number) == expected


def test_the_map_puts_the_caller_at_0_and_the_ranges_after_it():
    assert id_map(1000, [(100000, 65536), (300000, 10)]) == (
        (0, 1000, 1), (1, 100000, 65536), (65537, 300000, 10))
