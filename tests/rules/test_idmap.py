"""Pure rules of fuse-overlayfs's ownership options (unionfs.fs.idmap), table-driven.

The expected values of the mapping tables were read off a real fuse-overlayfs
1.10 mount with the same options (tests/podman/test_idmap_oracle.py checks
them against it again, side by side with fuse-unionfs).
"""
import os
import stat

import pytest

from unionfs.fs import idmap
from unionfs.fs.idmap import IdMap, IdOptionError, IdRange, Override, OverrideError

OVF = 65534

# ---- parsing uidmapping= ---------------------------------------------------------

PARSED = [
    ("0:100:10", ((0, 100, 10),)),
    (":0:100:10", ((0, 100, 10),)),                       # podman's leading colon
    ("0::100::1", ((0, 100, 1),)),                        # empty fields skipped
    (":0:1:1001:1001:0:1:1002:1002:64535",                # podman --userns=keep-id
     ((0, 1, 1001), (1001, 0, 1), (1002, 1002, 64535))),
    ("0:200000:65536", ((0, 200000, 65536),)),            # podman --uidmap as root
    ("0:100:0", ((0, 100, 0),)),                          # count 0: accepted, matches nothing
    ("", ()),                                             # empty: the identity
    (":", ()),
    ("4294967294:0:1", ((4294967294, 0, 1),)),            # the last valid id
]


@pytest.mark.parametrize("text,ranges", PARSED)
def test_parse_idmap(text, ranges):
    assert idmap.parse_idmap(text) == IdMap(tuple(IdRange(*r) for r in ranges))


MALFORMED = [
    ("0:100", "triples"),
    ("0:100:10:5", "triples"),
    ("a:100:1", "'a' is not a decimal"),
    ("0x10:100:1", "'0x10' is not a decimal"),
    ("-1:5:1", "'-1' is not a decimal"),                  # fuse-overlayfs: wraps to 2^32-1
    ("+1:100:1", r"'\+1' is not a decimal"),              # fuse-overlayfs: strtol takes it
    (" 1:100:1", "' 1' is not a decimal"),
    ("4294967295:5:1", "is not below 4294967295"),        # (uid_t)-1
    ("4294967296:5:2", "is not below"),                   # fuse-overlayfs: truncates to 0
    ("4294967290:0:10", "runs past 4294967294"),          # fuse-overlayfs: matches nothing
    ("0:4294967290:10", "runs past"),
    ("0:100:٣", "is not a decimal"),                      # a non-ASCII digit
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_idmap_is_one_line_error(text, message):
    with pytest.raises(IdOptionError, match=message) as info:
        idmap.parse_idmap(text, "uidmapping")
    assert "\n" not in str(info.value) and str(info.value).startswith("uidmapping=")


# ---- mapping in both directions -----------------------------------------------------

SHOWN = [
    # option, stored id -> shown id
    ("0:100:10:1000:0:2", {0: 100, 1: 101, 9: 109, 10: OVF, 1000: 0, 1001: 1, 1002: OVF}),
    (":0:100:10", {0: 100, 5: 105, 1000: OVF, 65534: OVF, 200000: OVF}),
    ("0:100:10:5:300:1", {0: 100, 5: 300, 6: 106}),      # overlap: the last listed wins
    ("5:300:1:0:100:10", {0: 100, 5: 105}),
    ("0:100:0", {0: OVF, 1: OVF}),
    (":0:1:1001:1001:0:1:1002:1002:64535",
     {0: 1, 1000: 1001, 1001: 0, 1002: 1002, 65536: 65536, 65537: OVF}),
    ("", {0: 0, 1234: 1234}),
]


@pytest.mark.parametrize("text,table", SHOWN)
def test_shown_ids(text, table):
    m = idmap.parse_idmap(text)
    assert {i: m.shown(i, OVF) for i in table} == table


STORED = [
    # option, caller's (or chown's) id -> stored id
    ("0:100:10", {100: 0, 105: 5, 0: OVF, 50: OVF}),     # root creating: stored as overflow
    (":0:1:1001:1001:0:1:1002:1002:64535", {0: 1001, 1: 0, 1001: 1000, 1002: 1002}),
    ("0:100:10:5:300:1", {300: 5, 105: 5, 100: 0}),
    ("", {0: 0, 7: 7}),
]


@pytest.mark.parametrize("text,table", STORED)
def test_stored_ids(text, table):
    m = idmap.parse_idmap(text)
    assert {i: m.stored(i, OVF) for i in table} == table


@pytest.mark.parametrize("text", ["0:100:10", ":0:1:1001:1001:0:1:1002:1002:64535",
                                  "0:200000:65536"])
def test_mapping_round_trips_inside_its_ranges(text):
    m = idmap.parse_idmap(text)
    for r in m.ranges:
        for stored in (r.stored, r.stored + r.count - 1):
            assert m.stored(m.shown(stored, OVF), OVF) == stored


def test_overflow_id_is_the_callers():
    m = idmap.parse_idmap("0:100:10")
    assert m.shown(50, 4242) == 4242 and m.stored(50, 4343) == 4343


# ---- the whole set: squash, precedence, option values -------------------------------------

OWNERS = [
    # options, stored (uid, gid) -> shown (uid, gid)
    ({"squash_to_root": None}, (1000, 7), (0, 0)),
    ({"squash_to_uid": "7"}, (1000, 8), (7, 8)),
    ({"squash_to_uid": "7", "squash_to_root": None}, (1000, 8), (7, 0)),
    ({"squash_to_gid": "7", "uidmapping": "0:100:10"}, (1, 1), (101, 7)),
    ({"uidmapping": "0:100:10"}, (1, 1), (101, 1)),      # no gidmapping: gids as stored
    ({"uidmapping": "0:100:10", "gidmapping": "0:200:10"}, (20, 3), (OVF, 203)),
]


@pytest.mark.parametrize("values,stored,shown", OWNERS)
def test_shown_owner(values, stored, shown):
    assert idmap.from_options(values).shown_owner(*stored) == shown


def test_squash_does_not_change_what_is_stored():
    rules = idmap.from_options({"squash_to_root": None, "uidmapping": "0:100:10"})
    assert rules.stored_owner(105, 3) == (5, 3)
    assert rules.squashed


def test_stored_owner_keeps_an_unchanged_id():
    rules = idmap.from_options({"uidmapping": "0:100:10", "gidmapping": "0:100:10"})
    assert rules.stored_owner(None, 103) == (None, 3)


def test_no_option_is_the_fast_path():
    rules = idmap.from_options({})
    assert rules.owners_unchanged and not rules.squashed
    assert rules.shown_owner(5, 6) == (5, 6) and rules.stored_owner(5, 6) == (5, 6)
    assert not idmap.from_options({"gidmapping": "0:1:1"}).owners_unchanged


BAD_OPTIONS = [
    ({"squash_to_uid": "abc"}, "squash_to_uid=abc"),
    ({"squash_to_uid": "-5"}, "squash_to_uid=-5"),       # fuse-overlayfs: shows 4294967291
    ({"squash_to_gid": None}, "squash_to_gid needs a value"),
    ({"squash_to_root": "1"}, "squash_to_root takes no value"),
    ({"xattr_permissions": "3"}, "must be 0, 1 or 2"),
    ({"xattr_permissions": "on"}, "must be 0, 1 or 2"),
    ({"uidmapping": None}, "uidmapping needs a value"),
    ({"gidmapping": "1:2"}, "gidmapping=1:2"),
]


@pytest.mark.parametrize("values,message", BAD_OPTIONS)
def test_bad_option_values(values, message):
    with pytest.raises(IdOptionError, match=message):
        idmap.from_options(values)


def test_flags_and_permissions_mode():
    rules = idmap.from_options({"noacl": None, "static_nlink": None, "xattr_permissions": "2"})
    assert rules.noacl and rules.static_nlink and rules.xattr_permissions == 2
    assert rules.dir_nlink(7) == 1
    assert idmap.from_options({}).dir_nlink(7) == 7


@pytest.mark.parametrize("content,expected", [("65534\n", 65534), ("4242", 4242)])
def test_overflow_id_file(content, expected):
    assert idmap.parse_overflow_id(content) == expected


@pytest.mark.parametrize("content", ["0\n", "", "x", "-1", "4294967295"])
def test_bad_overflow_id_file(content):
    with pytest.raises(IdOptionError, match="overflowuid"):
        idmap.parse_overflow_id(content)


# ---- override_stat values -------------------------------------------------------------------

DECODED = [
    (b"0:0:40755", Override(0, 0, 0o755)),                # fuse-overlayfs: type bits in mode
    (b"9:10:100640", Override(9, 10, 0o640)),
    (b"0:0:755", Override(0, 0, 0o755)),
    (b"1000:1011:0644:file", Override(1000, 1011, 0o644, stat.S_IFREG)),   # containers/storage
    (b"1001:1012:0755:dir", Override(1001, 1012, 0o755, stat.S_IFDIR)),
    (b"0:0:4755", Override(0, 0, 0o4755)),
    (b"0:0:0777:symlink", Override(0, 0, 0o777, stat.S_IFLNK)),
    (b"0:0:0666:pipe", Override(0, 0, 0o666, stat.S_IFIFO)),
    (b"0:0:0600:socket", Override(0, 0, 0o600, stat.S_IFSOCK)),
    (b"0:0:0666:char-1-3", Override(0, 0, 0o666, stat.S_IFCHR, (1, 3))),
    (b"0:6:0660:block-8-0", Override(0, 6, 0o660, stat.S_IFBLK, (8, 0))),
    (b"-1:12:40751", Override(idmap.NO_ID, 12, 0o751)),  # fuse-overlayfs < 1.14's chgrp
    (b"1:2:0644:directory", Override(1, 2, 0o644, stat.S_IFDIR)),   # types match by prefix
]


@pytest.mark.parametrize("value,expected", DECODED)
def test_decode_override(value, expected):
    assert idmap.decode_override(value) == expected


@pytest.mark.parametrize("value", [b"", b"0:0", b"a:0:755", b"0:0:9", b"0:0:0644:fifo",
                                   b"0:0:0644:char", b"0:0:0644:char-1", b"\xff:0:0",
                                   b"4294967296:0:0", b"0:0:", b"0: 0:755"])
def test_malformed_override(value):
    with pytest.raises(OverrideError, match="override_stat"):
        idmap.decode_override(value)


ENCODED = [
    ((0, 0, 0o755), b"0:0:0755"),
    ((9, 10, stat.S_IFREG | 0o640), b"9:10:0640"),        # type bits dropped
    ((1, 2, stat.S_IFDIR | 0o2775, stat.S_IFDIR), b"1:2:2775:dir"),
    ((0, 0, 0o666, stat.S_IFCHR, (1, 3)), b"0:0:0666:char-1-3"),
]


@pytest.mark.parametrize("args,value", ENCODED)
def test_encode_override(args, value):
    assert idmap.encode_override(*args) == value


@pytest.mark.parametrize("args", [a for a, _ in ENCODED])
def test_encode_decode_round_trip(args):
    uid, gid, mode = args[:3]
    ov = idmap.decode_override(idmap.encode_override(*args))
    assert (ov.uid, ov.gid, ov.perm) == (uid, gid, mode & 0o7777)


APPLIED = [
    # disk mode, override value -> shown mode, rdev
    (stat.S_IFREG | 0o755, b"0:0:0600", stat.S_IFREG | 0o600, 0),
    (stat.S_IFDIR | 0o755, b"0:0:0700:dir", stat.S_IFDIR | 0o700, 0),
    (stat.S_IFREG | 0o755, b"0:0:0666:char-1-3", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
    (stat.S_IFREG | 0o755, b"0:0:0660:block-259-300",
     stat.S_IFBLK | 0o660, os.makedev(259, 300)),
]


@pytest.mark.parametrize("disk_mode,value,mode,rdev", APPLIED)
def test_apply_override(disk_mode, value, mode, rdev):
    uid, gid, shown_mode, shown_rdev = idmap.apply_override(
        disk_mode, 0, idmap.decode_override(value))
    assert (shown_mode, shown_rdev) == (mode, rdev)


@pytest.mark.parametrize("mode,applies", [
    (stat.S_IFREG, True), (stat.S_IFDIR, True), (stat.S_IFLNK, False),
    (stat.S_IFIFO, False), (stat.S_IFCHR, False), (stat.S_IFSOCK, False)])
def test_only_dirs_and_files_are_overridden(mode, applies):
    assert idmap.applies_to(mode | 0o644) is applies


@pytest.mark.parametrize("mode,backing", [
    (stat.S_IFREG | 0o600, stat.S_IFREG | 0o755), (stat.S_IFDIR | 0o700, stat.S_IFDIR | 0o755),
    (stat.S_IFREG | 0o4711, stat.S_IFREG | 0o4755), (stat.S_IFIFO | 0o600, stat.S_IFIFO | 0o600)])
def test_backing_mode(mode, backing):
    assert idmap.backing_mode(mode) == backing


# ---- which xattr a layer uses ----------------------------------------------------------------

P, C, L = idmap.OVERRIDE_PRIVILEGED, idmap.OVERRIDE_CONTAINERS, idmap.OVERRIDE_LEGACY


@pytest.mark.parametrize("root,name", [
    ({P, C, L}, P), ({C, L}, C), ({L}, L), ({b"user.other"}, None), (set(), None)])
def test_layer_override_name(root, name):
    assert idmap.layer_override_name(root) == name


@pytest.mark.parametrize("mode,root,name", [
    (1, set(), P), (1, {C}, P), (2, set(), C), (2, {L}, L), (2, {C, L}, C), (0, {C}, None)])
def test_upper_override_name(mode, root, name):
    assert idmap.upper_override_name(mode, root) == name


@pytest.mark.parametrize("mode,lowers,seed", [
    (2, [{}, {C: b"1:1:0700:dir"}], b"1:1:0700:dir"),
    (2, [{L: b"2:2:0711"}, {C: b"1:1:0700:dir"}], b"2:2:0711"),     # top layer first
    (2, [{P: b"3:3:0755"}], idmap.DEFAULT_ROOT_OVERRIDE),
    (1, [{C: b"1:1:0700:dir"}, {P: b"3:3:0755"}], b"3:3:0755"),
    (1, [], b"0:0:0555"),
])
def test_upper_root_seed(mode, lowers, seed):
    assert idmap.upper_root_seed(mode, lowers) == seed


# ---- xattr names kept private --------------------------------------------------------------

NAMES = [
    # caller's name, layer's override -> stored name (None: refused)
    (b"user.foo", None, b"user.foo"),
    (b"user.containers.override_stat", None, None),     # forging owners: refused
    (b"user.containers.override_stat", C, None),
    (b"user.fuseoverlayfs.override_stat", L, None),
    (b"security.fuseoverlayfs.override_stat", P, None),
    (b"security.capability", None, b"security.capability"),
    (b"security.capability", C, b"user.containers.override_security.capability"),
    (b"security." + b"x" * 240, C, None),                # encoded name too long
    (b"trusted.foo", C, b"trusted.foo"),
]


@pytest.mark.parametrize("name,layer,stored", NAMES)
def test_stored_xattr_name(name, layer, stored):
    assert idmap.stored_xattr_name(name, layer) == stored


LISTED = [
    # stored name, layer's override -> shown name (None: hidden)
    (b"user.foo", C, b"user.foo"),
    (b"user.containers.override_stat", C, None),
    (b"user.containers.override_stat", None, None),
    (b"user.containers.override_security.capability", C, b"security.capability"),
    (b"security.selinux", C, None),                      # the disk's own label
    (b"security.selinux", None, b"security.selinux"),
    (b"security.fuseoverlayfs.override_stat", P, None),
]


@pytest.mark.parametrize("stored,layer,shown", LISTED)
def test_shown_xattr_name(stored, layer, shown):
    assert idmap.shown_xattr_name(stored, layer) == shown


@pytest.mark.parametrize("name", [b"user.foo", b"security.capability", b"security.ima"])
def test_xattr_name_round_trip_in_containers_layers(name):
    stored = idmap.stored_xattr_name(name, C)
    assert idmap.shown_xattr_name(stored, C) == name
