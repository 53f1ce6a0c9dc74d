"""Bit-parallel longest common subsequences for ROUGE-L and ROUGE-Lsum, exact to the classic table.

The classic table ``T[i][j]`` = LCS of ``ref[:i]`` and ``can[:j]``. Column ``j`` of it is held in
one integer ``v``: bit ``i-1`` of ``v`` is 0 exactly where ``T[i][j] = T[i-1][j] + 1`` (the column
steps up at row ``i``), so ``T[i][j]`` is the number of 0 bits among bits ``0..i-1``. With
``match[t]`` the bits of the rows whose token is ``t``, the next column is (Allison & Dix 1986;
Hyyro 2004)

    u = v & match[can[j]];   v = (v + u) | (v - u)

a handful of big-integer operations per token instead of a Python loop over the rows.

ROUGE-Lsum needs more than the length: the reference positions of the one LCS rouge-score's
backtracking picks, for every (reference sentence, predicted sentence) pair. That walk starts at
``(i, j) = (|ref|, |can|)`` and repeats: on a match take the diagonal (keep ``i-1``), else go left
when ``T[i][j-1] > T[i-1][j]`` and up otherwise. Without a match, ``T[i][j-1] > T[i-1][j]`` holds
exactly when the column steps up at row ``i`` (bit ``i-1`` of ``v_j`` is 0), so inside column ``j``
the walk climbs to the nearest row at or above it that matches or steps up, then leaves the column.

All reference sentences are packed into one integer, each above a guard bit (row 0 of the sentence
above it, the carry sink of the sentence below it), so one pass over a predicted sentence advances
every pair at once. For the walk the integers are bit-reversed (rows then run towards higher bits),
and "climb to the nearest stop" becomes a carry: with ``t`` the rows where the walk keeps climbing,
``(t + markers) & ~t`` moves every sentence's one-bit marker to its stop in one addition.
"""

from __future__ import annotations

_REVERSED_BYTE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (bit-parallel, see module doc)."""
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        if u:  # u == 0 leaves the column as it was
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _reverse(x: int, nbytes: int) -> int:
    """``x`` with its ``8 * nbytes`` low bits in reverse order (bit k -> bit 8*nbytes-1-k)."""
    return int.from_bytes(x.to_bytes(nbytes, "little").translate(_REVERSED_BYTE), "big")


class PackedReference:
    """Reference sentences packed into one integer, for the union LCS of ROUGE-Lsum.

    Bit 0 is a guard; sentence ``s`` holds its rows ``1..n_s`` at consecutive bits and a guard bit
    above them, which is also row 0 of sentence ``s+1``.
    """

    def __init__(self, sentences: list[list[str]]) -> None:
        self.lengths = [len(sentence) for sentence in sentences]
        self.nbytes = nbytes = (sum(self.lengths) + len(sentences) + 1 + 7) // 8
        top = 8 * nbytes - 1  # bit k of the packed layout is bit top - k of the reversed one
        match: dict[str, int] = {}
        reversed_match: dict[str, int] = {}
        rows = tops = row_zeros = 0
        bit = 1
        for sentence in sentences:
            row_zeros |= 1 << (bit - 1)
            for token in sentence:
                match[token] = match.get(token, 0) | (1 << bit)
                reversed_match[token] = reversed_match.get(token, 0) | (1 << (top - bit))
                bit += 1
            rows |= ((1 << len(sentence)) - 1) << (bit - len(sentence))
            tops |= 1 << (bit - 1)  # the last row; row 0 for an empty sentence
            bit += 1
        self.match, self.reversed_match, self.rows = match, reversed_match, rows
        self.start = _reverse(tops, nbytes)  # one marker per sentence, at (|ref|, |can|)
        self.done = _reverse(row_zeros, nbytes)  # every marker on its sentence's row 0

    def union_lcs(self, candidates: list[list[str]]) -> int:
        """Bit-reversed positions of every reference sentence's union of LCSs with ``candidates``.

        The same positions as rouge-score's ``_union_lcs`` (its table and backtracking) for every
        reference sentence; bit-reversed like ``reversed_match``, so
        ``(union & reversed_match[t]).bit_count()`` counts the union's tokens ``t``.
        """
        match, reversed_match, rows, nbytes = self.match, self.reversed_match, self.rows, self.nbytes
        union, from_bytes = 0, int.from_bytes
        for can in candidates:
            columns = []  # (token, column after it)
            v = rows
            for token in can:
                m = match.get(token)
                if m is not None:
                    u = v & m
                    if u:
                        v = ((v + u) | (v - u)) & rows
                columns.append((token, v))
            markers, last = self.start, None
            for token, v in reversed(columns):
                m = reversed_match.get(token, 0)
                if not m and v is last:
                    continue  # the same column again without a match: every marker stays put
                last = None if m else v
                # rows where the walk keeps climbing: the column (bit-reversed) off the matches
                t = from_bytes(v.to_bytes(nbytes, "little").translate(_REVERSED_BYTE), "big") & ~m
                stops = (t + markers) & ~t
                hits = stops & m
                union |= hits
                markers = (stops ^ hits) | (hits << 1)  # a diagonal step: one row up
                if markers == self.done:
                    break
        return union

    def positions(self, union: int) -> list[list[int]]:
        """``union`` (from ``union_lcs``) as sorted token indices, one list per reference sentence."""
        bits = _reverse(union, self.nbytes)
        out, bit = [], 1
        for length in self.lengths:
            out.append([i for i in range(length) if bits >> (bit + i) & 1])
            bit += length + 1
        return out
