"""The mount configuration's one serialized form (JSON), and the FUSE options
a config and the server's privilege give. Pure: no mount."""
import json

import pytest

from unionfs.fs.profile import Profile
from unionfs.serve.config import MountConfig, OptionError, apply_options
from unionfs.serve.server import fuse_options


def full_config():
    cfg = MountConfig(lowers=["/l 1", "/l\t2"], upper="/u\n", work="/w\\", mountpoint="/m",
                      source="overlay", foreground=True, debug=True)
    apply_options(cfg, "volatile,metacopy=on,whiteout=oci,noatime,nodev")
    return cfg


def test_a_config_survives_its_json_round_trip():
    cfg = full_config()
    assert MountConfig.from_json(cfg.to_json()) == cfg
    assert MountConfig.from_json(MountConfig().to_json()) == MountConfig()


def test_a_path_that_is_not_utf8_survives_the_trip():
    cfg = MountConfig(lowers=["/layer-\udcff\udcfe"], mountpoint="/m-\udc80")
    text = cfg.to_json()
    text.encode("ascii")  # the wire form is plain ASCII
    assert MountConfig.from_json(text) == cfg


def test_the_json_is_one_line():
    assert "\n" not in full_config().to_json()


@pytest.mark.parametrize("change", [
    {"lowers": "/not-a-list"}, {"lowers": [1]}, {"upper": 5}, {"debug": "yes"},
    {"flags": [None]}, {"mountpoint": ["/m"]},
])
def test_a_field_of_the_wrong_type_is_refused(change):
    data = dict(json.loads(MountConfig().to_json()), **change)
    with pytest.raises(ValueError, match="mount configuration field"):
        MountConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("data", [
    {"lowers": []},                                             # fields missing
    [],                                                         # not an object
    dict(json.loads(MountConfig().to_json()), extra=1),         # a field unknown
])
def test_missing_or_unknown_fields_are_refused(data):
    with pytest.raises(ValueError, match="not a mount configuration"):
        MountConfig.from_json(json.dumps(data))


def test_privileged_servers_ask_for_allow_other_dev_and_suid():
    cfg = MountConfig(lowers=["/l"], upper="/u", work="/w")
    assert {"allow_other", "dev", "suid"} <= fuse_options(cfg, allow_other=True, dev_suid=True)
    assert not {"allow_other", "dev", "suid"} & fuse_options(cfg, allow_other=False)


def test_root_of_a_user_namespace_asks_for_allow_other_only():
    """rootless podman runs keep-id containers in a child namespace: FUSE
    serves them only with allow_other; dev and suid stay real root's."""
    opts = fuse_options(MountConfig(lowers=["/l"]), allow_other=True, dev_suid=False)
    assert "allow_other" in opts and not {"dev", "suid"} & opts


@pytest.mark.parametrize("caps_admin, init_ns, wanted", [
    (True, True, (True, True)), (True, False, (True, False)), (False, True, (False, False)),
    (False, False, (False, False))])
def test_the_profile_decides_allow_other_by_capability_not_by_namespace(caps_admin, init_ns,
                                                                        wanted):
    p = Profile(init_userns=init_ns, sys_admin=caps_admin)
    assert (p.allow_other, p.dev_suid) == wanted


def test_nodev_nosuid_and_a_read_only_stack_are_honoured():
    cfg = MountConfig(lowers=["/l"])
    apply_options(cfg, "nodev,nosuid")
    opts = fuse_options(cfg, allow_other=True, dev_suid=True)
    assert "allow_other" in opts and "ro" in opts
    assert not {"dev", "suid"} & opts and {"nodev", "nosuid"} <= opts


def test_id_options_are_kept_as_given_and_travel_in_the_json():
    cfg = apply_options(MountConfig(), "lowerdir=/a,uidmapping=:0:1001:1,gidmapping=:0:1001:1,"
                        "squash_to_root,xattr_permissions=2,noacl,static_nlink")
    assert cfg.id_options == {"uidmapping": ":0:1001:1", "gidmapping": ":0:1001:1",
                              "squash_to_root": None, "xattr_permissions": "2",
                              "noacl": None, "static_nlink": None}
    assert MountConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("text, words", [
    ("uidmapping=0:100", "uidmapping=0:100: not a list of .* triples"),
    ("gidmapping=a:1:1", "gidmapping=a:1:1: 'a' is not a decimal"),
    ("squash_to_uid=-1", "'-1' is not a decimal"),
    ("squash_to_gid", "squash_to_gid needs a value"),
    ("xattr_permissions=3", "xattr_permissions=3: must be 0, 1 or 2"),
    ("noacl=1", "noacl takes no value"),
])
def test_a_malformed_id_option_is_a_usage_error_at_parse_time(text, words):
    with pytest.raises(OptionError, match=words):
        apply_options(MountConfig(), f"lowerdir=/a,{text}")


@pytest.mark.parametrize("change", [{"id_options": []}, {"id_options": {"bogus": None}},
                                    {"id_options": {"noacl": 1}}])
def test_id_options_of_the_wrong_shape_are_refused_in_the_json(change):
    data = dict(json.loads(MountConfig().to_json()), **change)
    with pytest.raises(ValueError, match="mount configuration field"):
        MountConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("text, fmt", [("whiteout=userxattr", "userxattr"),
                                       ("userxattr", "userxattr"),
                                       ("userxattr,whiteout=userxattr", "userxattr"),
                                       ("whiteout=kernel", "kernel")])
def test_the_marker_format_can_be_forced(text, fmt):
    assert apply_options(MountConfig(), text).whiteout_format == fmt


def test_conflicting_marker_formats_are_refused():
    with pytest.raises(OptionError, match="conflicting marker formats: oci and userxattr"):
        apply_options(MountConfig(), "whiteout=oci,userxattr")


def test_an_unknown_option_is_a_usage_error():
    with pytest.raises(OptionError, match="unknown option"):
        apply_options(MountConfig(), "lowerdir=/a,bogus=1")


@pytest.mark.parametrize("value, layers", [
    ("/a", ["/a"]),
    ("/a:/b:/c", ["/a", "/b", "/c"]),
    ("/a:/b::/data", ["/a", "/b", "/data"]),
    ("/odd\\:name:/b", ["/odd:name", "/b"]),
])
def test_lowerdir_is_split_as_the_kernel_splits_it(value, layers):
    assert apply_options(MountConfig(), f"lowerdir={value}").lowers == layers


@pytest.mark.parametrize("text, words", [
    ("lowerdir=/a:", "empty layer"),
    ("lowerdir=:/a", "empty layer"),
    ("lowerdir=/a:::/b", "empty layer"),
    ("lowerdir=", "at least one"),
    ("upperdir=", "upperdir= needs a directory"),
    ("workdir=", "workdir= needs a directory"),
    ("=", "unknown option '='"),
])
def test_empty_option_values_are_refused(text, words):
    with pytest.raises(OptionError, match=words):
        apply_options(MountConfig(), text)


def test_messages_show_paths_as_they_are_but_on_one_line():
    with pytest.raises(OptionError, match="unknown option 'x=/a\\\\nb'"):
        apply_options(MountConfig(), "x=/a\nb")


@pytest.mark.parametrize("text, on", [("noxattrs=1", False), ("noxattrs", False),
                                      ("noxattrs=0", True), ("", True)])
def test_noxattrs_turns_xattrs_off(text, on):
    assert apply_options(MountConfig(), text).xattrs is on


def test_noxattrs_takes_0_or_1():
    with pytest.raises(OptionError, match="noxattrs= must be 0 or 1, not '2'"):
        apply_options(MountConfig(), "noxattrs=2")


def test_fuse_unionfs_mounts_as_fuse_overlayfs_does_by_default():
    from unionfs.cli import fuse
    cfg = fuse.parse(["/mnt", "-o", "lowerdir=/a"])
    assert (cfg.subtype, cfg.source) == ("fuse-unionfs", "fuse-unionfs")
    assert {"nodev", "noatime"} <= set(cfg.flags)


def test_fuse_unionfs_keeps_the_flags_it_is_given():
    from unionfs.cli import fuse
    cfg = fuse.parse(["src", "/mnt", "-o", "lowerdir=/a,dev,relatime"])
    assert cfg.source == "src"
    assert {"dev", "relatime"} <= set(cfg.flags) and not {"nodev", "noatime"} & set(cfg.flags)


def test_unionfs_mount_keeps_its_own_type():
    assert MountConfig().subtype == "unionfs"


@pytest.mark.parametrize("text", ["subtype=", "subtype=a b", "subtype=x/y", "subtype=" + "s" * 65])
def test_a_bad_subtype_is_a_usage_error(text):
    with pytest.raises(OptionError, match="subtype="):
        apply_options(MountConfig(), "lowerdir=/a," + text)


def test_the_subtype_names_the_fuse_type():
    cfg = apply_options(MountConfig(), "lowerdir=/a,subtype=my-union")
    assert "subtype=my-union" in fuse_options(cfg, allow_other=False)


@pytest.mark.parametrize("text, mode", [
    ("", "off"), ("redirect_dir=on", "on"), ("redirect_dir=follow", "follow"),
    ("redirect_dir=nofollow", "nofollow"), ("redirect_dir=off", "off"),
    ("redirect_dir=on,redirect_dir=off", "off"),        # the last one wins, as for the kernel
    ("whiteout=kernel,redirect_dir=on", "on"), ("userxattr,redirect_dir=nofollow", "nofollow"),
    ("whiteout=oci,redirect_dir=follow", "follow"),
])
def test_redirect_dir_takes_the_kernels_modes(text, mode):
    cfg = apply_options(MountConfig(), text)
    assert cfg.redirect_dir == mode
    assert MountConfig.from_json(cfg.to_json()).redirect_dir == mode


@pytest.mark.parametrize("value", ["yes", "ON", "1", "onn", "follow\n"])
def test_a_bad_redirect_dir_is_refused_in_one_line(value):
    with pytest.raises(OptionError) as e:
        apply_options(MountConfig(), f"redirect_dir={value}")
    assert "redirect_dir= must be 'on', 'follow', 'nofollow' or 'off'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["userxattr,redirect_dir=on", "redirect_dir=follow,userxattr",
                                  "whiteout=userxattr,redirect_dir=on"])
def test_redirects_are_refused_with_the_userxattr_format_as_by_the_kernel(text):
    with pytest.raises(OptionError) as e:
        apply_options(MountConfig(), text)
    assert "cannot be used with the userxattr format" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["whiteout=oci,redirect_dir=on", "redirect_dir=on,whiteout=oci"])
def test_redirect_dir_on_is_refused_with_the_oci_format(text):
    with pytest.raises(OptionError, match="redirect_dir=on needs a format with xattrs"):
        apply_options(MountConfig(), text)
