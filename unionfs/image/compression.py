"""Layer (de)compression: gzip through python-isal's igzip (ISA-L: several
times faster than zlib both ways), zstd through zstandard. Both are imported
only here and only when a compressed layer is read or written, so commands
that never touch a layer (`unionfs run`, `mount`) never load them.
"""
from .applier import LayerError
from .formats import COMPRESSIONS, sniff_compression

CHUNK = 1 << 20


class Prefixed:
    """A reader that first returns `head` (already read from raw), then raw."""

    def __init__(self, head: bytes, raw):
        self.head = head
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.raw.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            if len(data) < n:
                data += self.raw.read(n - len(data))
            return data
        return self.raw.read(n)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


def sniff(raw):
    """(compression, reader positioned at the start) from a stream's magic."""
    head = b""
    while len(head) < 4:
        more = raw.read(4 - len(head))
        if not more:
            break
        head += more
    return sniff_compression(head), Prefixed(head, raw)


class CorruptLayer(LayerError):
    """The compressed stream is damaged."""


class _Checked:
    """Turns the decompressor's own errors into one CorruptLayer line."""

    def __init__(self, reader, compression: str):
        self.reader = reader
        self.compression = compression

    def read(self, n: int = -1) -> bytes:
        try:
            return self.reader.read(n)
        except LayerError:
            raise
        except Exception as e:      # isal: BadGzipFile/OSError/EOFError; zstandard: ZstdError
            raise CorruptLayer(f"corrupt {self.compression} layer data: "
                               f"{e or type(e).__name__}") from None

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


def decompressing_reader(raw, compression: str):
    """A reader of the uncompressed bytes of `raw` (every gzip member, every
    zstd frame)."""
    if compression == "gzip":
        from isal import igzip
        return _Checked(igzip.IGzipFile(fileobj=raw, mode="rb"), compression)
    if compression == "zstd":
        import zstandard
        return _Checked(zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False), compression)
    if compression == "none":
        return raw
    raise ValueError(f"unknown compression {compression!r}")


class _Compressor:
    def __init__(self, dst, compression: str, level: int | None):
        self.compression = compression
        if compression == "gzip":
            from isal import igzip
            # ISA-L's levels are 0-3; 1 is its fast default for streams
            self.f = igzip.IGzipFile(fileobj=dst, mode="wb",
                                     compresslevel=1 if level is None else level, mtime=0)
        elif compression == "zstd":
            import zstandard
            self.f = zstandard.ZstdCompressor(level=3 if level is None else level) \
                .stream_writer(dst, closefd=False)
        elif compression == "none":
            self.f = None
            self.dst = dst
        else:
            raise ValueError(f"unknown compression {compression!r} "
                             f"(one of {', '.join(COMPRESSIONS)})")

    def write(self, data) -> int:
        if self.f is None:
            return self.dst.write(data)
        self.f.write(data)
        return len(data)

    def close(self) -> None:
        """Finish the stream (does not close dst)."""
        if self.f is not None:
            if self.compression == "zstd":
                from zstandard import FLUSH_FRAME
                self.f.flush(FLUSH_FRAME)
            else:
                self.f.close()
            self.f = None


def compressing_writer(dst, compression: str, level: int | None = None) -> _Compressor:
    """A writer that compresses into dst; close() ends the stream."""
    return _Compressor(dst, compression, level)
