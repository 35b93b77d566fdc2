"""Pure rules of fs.redirect, no mount: the modes, the xattr of each marker
format, which values are valid, where a redirect sends a lookup, and the value
a rename of a lower or merged directory writes (the kernel's ovl_set_redirect)."""
import pytest

from unionfs.fs import redirect, whiteout


@pytest.mark.parametrize("mode, creates, follows", [
    ("on", True, True),
    ("follow", False, True),
    ("nofollow", False, False),
    ("off", False, False),
])
def test_which_modes_create_and_which_follow(mode, creates, follows):
    assert redirect.creates(mode) is creates
    assert redirect.follows(mode) is follows


def test_the_modes_are_the_kernels_four():
    assert set(redirect.MODES) == {"on", "follow", "nofollow", "off"}


@pytest.mark.parametrize("fmt, name", [
    (whiteout.FORMAT_KERNEL, "trusted.overlay.redirect"),
    (whiteout.FORMAT_USERXATTR, "user.overlay.redirect"),
    (whiteout.FORMAT_OCI, None),
])
def test_each_marker_format_has_its_redirect_xattr(fmt, name):
    assert redirect.xattr_name(fmt) == name


@pytest.mark.parametrize("value, parts", [
    (b"a", (b"a",)),
    (b"old name", (b"old name",)),
    (b"/a", (b"a",)),
    (b"/a/b/c", (b"a", b"b", b"c")),
    (b"...", (b"...",)),            # only "." and ".." are special
    (b"/a/.hidden", (b"a", b".hidden")),
])
def test_valid_values_parse_to_their_components(value, parts):
    assert redirect.parse(value) == parts


@pytest.mark.parametrize("value", [
    b"",                # empty
    b"a/b",             # relative with a "/"
    b"a/",
    b"/",               # absolute with an empty component
    b"//a",
    b"/a//b",
    b"/a/",
    b".", b"..",        # never a real name
    b"/..", b"/a/../b", b"/a/.", b"/./a",
    b"a\0b",            # an embedded NUL
    b"/a\0/b",
])
def test_invalid_values_are_refused(value):
    with pytest.raises(redirect.InvalidRedirect):
        redirect.parse(value)


def test_invalid_redirect_is_a_value_error():
    assert issubclass(redirect.InvalidRedirect, ValueError)


@pytest.mark.parametrize("value, absolute", [(b"a", False), (b"/a", True), (b"/a/b", True)])
def test_absolute_values_start_with_a_slash(value, absolute):
    assert redirect.is_absolute(value) is absolute


@pytest.mark.parametrize("current, value, path", [
    ((b"p", b"new"), b"old", (b"p", b"old")),          # relative: the last name replaced
    ((b"new",), b"old", (b"old",)),
    ((b"p", b"q", b"new"), b"/x/y", (b"x", b"y")),      # absolute: the whole path
    ((b"new",), b"/x", (b"x",)),
])
def test_a_redirect_sends_the_lookup_to_its_place(current, value, path):
    assert redirect.redirected_path(current, value) == path


def test_redirected_path_refuses_an_invalid_value():
    with pytest.raises(redirect.InvalidRedirect):
        redirect.redirected_path((b"a",), b"../etc")


# value_for_rename(existing, same_dir, old_name, ancestry):
# ancestry is (name, redirect or None) from the directory up to below the root

def test_a_rename_in_the_same_parent_writes_the_old_name_alone():
    assert redirect.value_for_rename(None, True, b"a", [(b"a", None), (b"p", None)]) == b"a"


@pytest.mark.parametrize("ancestry, value", [
    ([(b"a", None)], b"/a"),
    ([(b"a", None), (b"p", None)], b"/p/a"),
    ([(b"a", None), (b"q", None), (b"p", None)], b"/p/q/a"),
])
def test_a_rename_into_another_parent_writes_the_path_from_the_layer_root(ancestry, value):
    assert redirect.value_for_rename(None, False, b"a", ancestry) == value


def test_an_ancestors_relative_redirect_stands_for_its_name():
    # p was renamed from "old" in its parent: its lower contents are at /old
    ancestry = [(b"a", None), (b"p", b"old")]
    assert redirect.value_for_rename(None, False, b"a", ancestry) == b"/old/a"


def test_an_ancestors_absolute_redirect_ends_the_path():
    ancestry = [(b"a", None), (b"q", b"/x/y"), (b"p", None)]
    assert redirect.value_for_rename(None, False, b"a", ancestry) == b"/x/y/a"


@pytest.mark.parametrize("existing, same_dir", [
    (b"a", True),       # relative, staying in its parent: still right
    (b"/x/a", True),    # absolute: right wherever the directory goes
    (b"/x/a", False),
])
def test_a_redirect_that_is_still_right_is_kept(existing, same_dir):
    assert redirect.value_for_rename(existing, same_dir, b"b", [(b"b", existing)]) is None


def test_a_relative_redirect_becomes_absolute_when_the_directory_leaves_its_parent():
    # p/a was renamed p/b (redirect "a"), now p/b goes to q/b: /p/a
    ancestry = [(b"b", b"a"), (b"p", None)]
    assert redirect.value_for_rename(b"a", False, b"b", ancestry) == b"/p/a"


def test_the_kernels_redirect_max_is_the_limit():
    # the kernel's default redirect_max (module parameter) is 256
    assert redirect.REDIRECT_MAX == 256
    name = b"n" * 255
    assert redirect.value_for_rename(None, False, name, [(name, None)]) == b"/" + name


def test_a_value_longer_than_redirect_max_is_refused():
    long_path = [(b"c" * 200, None), (b"p" * 100, None)]
    with pytest.raises(redirect.InvalidRedirect):
        redirect.value_for_rename(None, False, b"c" * 200, long_path)


@pytest.mark.parametrize("mode, fmt, meaning", [
    ("off", whiteout.FORMAT_KERNEL, "follow"),        # redirect_always_follow=Y, the default
    ("off", whiteout.FORMAT_USERXATTR, "nofollow"),   # userxattr forces nofollow
    ("off", whiteout.FORMAT_OCI, "nofollow"),
    ("on", whiteout.FORMAT_KERNEL, "on"),
    ("nofollow", whiteout.FORMAT_KERNEL, "nofollow"),
    ("follow", whiteout.FORMAT_USERXATTR, "follow"),
])
def test_off_means_what_the_kernels_off_means(mode, fmt, meaning):
    assert redirect.effective(mode, fmt) == meaning


@pytest.mark.parametrize("mode, fmt, refused", [
    ("on", whiteout.FORMAT_KERNEL, False), ("follow", whiteout.FORMAT_KERNEL, False),
    ("on", whiteout.FORMAT_USERXATTR, True), ("follow", whiteout.FORMAT_USERXATTR, True),
    ("nofollow", whiteout.FORMAT_USERXATTR, False), ("off", whiteout.FORMAT_USERXATTR, False),
    ("on", whiteout.FORMAT_OCI, True), ("follow", whiteout.FORMAT_OCI, False),
])
def test_which_modes_a_format_refuses(mode, fmt, refused):
    assert (redirect.refused_with(mode, fmt) is not None) == refused
