"""Read ASTM capture files in the four storage styles of the corpus (SOURCES.md).

(a) a full link-layer session ``ENQ STX FN text ETX|ETB C1 C2 CR LF ... EOT``;
(b) frames whose CR before LF was lost; (c) a whole message in one frame, often
without LF; (d) plain records separated by CR, LF or CRLF, no framing.

The reader returns the frames as they would go on the wire (``send astm`` replays
them, bad checksums included) and the de-framed message texts (``decode``), plus
the checksum problems it found, so the negative examples are reported rather than
silently repaired. Files that are not E1381/E1394 at all (PROTOCOLS 43) are flagged
with ``not_astm_reason``.

This module must not import the engine (DESIGN: engine -> drivers only), so it
carries its own three-line checksum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from drivers.astm.records import is_header_line, split_messages, split_record_lines

__all__ = ["ASTMCapture", "FrameProblem", "read_astm_file", "wire_frames"]

STX, ETX, EOT, ENQ, ETB = 0x02, 0x03, 0x04, 0x05, 0x17
_HEX = b"0123456789ABCDEFabcdef"

Style = Literal["session", "frames", "single-frame", "records", "not-astm"]


def _checksum(body: bytes) -> bytes:
    return b"%02X" % (sum(body) & 0xFF)


@dataclass(frozen=True, slots=True)
class FrameProblem:
    """A frame whose checksum does not match (PROTOCOLS 19, 30)."""

    session: int  # 0-based
    frame: int  # 0-based within the session
    fn: int
    sent: str  # checksum as written in the file
    computed: str

    def describe(self) -> str:
        return (
            f"session {self.session + 1} frame {self.frame + 1} (FN {self.fn}): checksum "
            f"{self.sent} in the file, {self.computed} computed; a receiver NAKs it"
        )


@dataclass(frozen=True, slots=True)
class ASTMCapture:
    """What a capture file holds."""

    style: Style
    sessions: tuple[tuple[bytes, ...], ...] = ()
    messages: tuple[bytes, ...] = ()
    problems: tuple[FrameProblem, ...] = ()
    not_astm_reason: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def frames(self) -> tuple[bytes, ...]:
        return tuple(f for s in self.sessions for f in s)

    @property
    def is_astm(self) -> bool:
        return self.style != "not-astm"


def wire_frames(text: bytes, frame_size: int = 240, first_fn: int = 1) -> list[bytes]:
    """Frame one message for the wire (used for storage style (d))."""
    chunks = [text[i : i + frame_size] for i in range(0, len(text), frame_size)] or [b""]
    frames = []
    for index, chunk in enumerate(chunks):
        term = ETX if index == len(chunks) - 1 else ETB
        body = b"%d" % ((first_fn + index) % 8) + chunk + bytes([term])
        frames.append(bytes([STX]) + body + _checksum(body) + b"\r\n")
    return frames


def read_astm_file(data: bytes) -> ASTMCapture:
    """Read one capture file in any of the four storage styles."""
    if STX in data:
        return _read_framed(data)
    text = data.lstrip(b"\x05 \t\r\n").rstrip(b"\x04")
    notes: list[str] = []
    if text[:1].isdigit() and is_header_line(text[1:8]):
        # corpus:mindray_bs_series__1: a frame number left in front of the H record only
        text = text[1:]
        notes.append("a frame number stood before the H record without framing; dropped")
    lines = split_record_lines(text)
    if not lines or not is_header_line(lines[0]):
        return ASTMCapture(
            style="not-astm",
            not_astm_reason=(
                "no STX framing and the first line is not an ASTM H record "
                "(PROTOCOLS 43: route it to a vendor adapter)"
            ),
        )
    # (d) plain records: normalise separators to CR and frame each message anew
    messages = tuple(split_messages(b"\r".join(lines)))
    frames: list[bytes] = []
    for message in messages:
        # PROTOCOLS 18: FN continues across the messages of one transfer phase
        frames += wire_frames(message, first_fn=(len(frames) + 1) % 8)
    return ASTMCapture(
        style="records",
        sessions=(tuple(frames),),
        messages=messages,
        notes=(*notes, "plain records: frames built by the reader (240 characters, FN from 1)"),
    )


def _read_framed(data: bytes) -> ASTMCapture:
    sessions: list[list[bytes]] = [[]]
    texts: list[bytes] = []
    problems: list[FrameProblem] = []
    notes: list[str] = []
    saw_enq = ENQ in data
    lost_cr = False
    i = 0
    n = len(data)
    while i < n:
        byte = data[i]
        if byte == ENQ and sessions[-1]:
            sessions.append([])
        if byte == EOT and sessions[-1]:
            sessions.append([])
        if byte != STX:
            i += 1
            continue
        # find the end of the frame text
        j = i + 1
        while j < n and data[j] not in (ETX, ETB, STX, EOT, ENQ):
            j += 1
        if j >= n or data[j] not in (ETX, ETB):
            return _not_astm("STX without a matching ETX/ETB")
        body = data[i + 1 : j + 1]
        if not body[:1].isdigit():
            return _not_astm(
                "STX is not followed by a frame number: not an E1381 frame "
                "(PROTOCOLS 43, e.g. mini VIDAS or Spotchem output)"
            )
        sent = data[j + 1 : j + 3]
        if len(sent) != 2 or any(c not in _HEX for c in sent):
            return _not_astm("frame without two checksum characters after ETX/ETB")
        computed = _checksum(body)
        frame_no = len(sessions[-1])
        if sent.upper() != computed:
            problems.append(
                FrameProblem(
                    len(sessions) - 1, frame_no, body[0] - 0x30, sent.decode(), computed.decode()
                )
            )
        k = j + 3
        trailer = data[k : k + 2]
        if trailer != b"\r\n":
            lost_cr = True
        # skip whatever trailer the storage left: CR, LF, CR LF, or CR CR LF
        while k < n and data[k] in (0x0D, 0x0A):
            k += 1
        sessions[-1].append(data[i : j + 3] + b"\r\n")
        texts.append(body[1:-1])
        i = k
    sessions = [s for s in sessions if s]
    if not sessions:
        return _not_astm("no frames found")
    joined = b"".join(texts)
    messages = tuple(m for m in split_messages(joined) if m.strip())
    if lost_cr:
        notes.append("frame trailers are not CR LF in the file (storage artefact, PROTOCOLS 42)")
    frame_count = sum(len(s) for s in sessions)
    style: Style = "session" if saw_enq else ("single-frame" if frame_count == 1 else "frames")
    if messages and not is_header_line(messages[0]):
        notes.append("de-framed text does not start with an H record")
    return ASTMCapture(
        style=style,
        sessions=tuple(tuple(s) for s in sessions),
        messages=messages,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def _not_astm(reason: str) -> ASTMCapture:
    if "E1381" not in reason:
        reason += " (not E1381 framing; PROTOCOLS 43: route it to a vendor adapter)"
    return ASTMCapture(style="not-astm", not_astm_reason=reason)
