"""An independent pure-Python model of a tracked volume: the volume bytes,
the chain of intervals with their change/block/zero maps, and snapshots
(image at the snappoint + valid map).  It shares no code with replication/.
"""


class Interval:
    def __init__(self):
        self.cmap, self.bmap, self.zmap = set(), set(), set()
        self.closed_by = None


class Model:
    def __init__(self, data, region, block):
        self.vol = bytearray(data)
        self.size = len(data)
        self.region, self.block = region, block
        self.intervals = [Interval()]
        self.snaps = {}            # name -> [image bytes, vmap set]  (valid snapshots)
        self.names = []            # snappoints in order

    def _regions(self, off, n):
        return range(off // self.region, (off + n - 1) // self.region + 1)

    def _blocks(self, off, n):
        return range(off // self.block, (off + n - 1) // self.block + 1)

    def _modify(self, off, n):
        for img_vmap in self.snaps.values():
            img_vmap[1].update(self._blocks(off, n))
        iv = self.intervals[-1]
        iv.cmap.update(self._regions(off, n))
        iv.bmap.update(self._blocks(off, n))
        iv.zmap.difference_update(self._blocks(off, n))

    def write(self, off, data):
        if not data:
            return
        self._modify(off, len(data))
        self.vol[off:off + len(data)] = data

    def zero(self, off, n):
        if not n:
            return
        self._modify(off, n)
        self.vol[off:off + n] = bytes(n)
        for b in self._blocks(off, n):
            lo, hi = b * self.block, min((b + 1) * self.block, self.size)
            if off <= lo and hi <= off + n:
                self.intervals[-1].zmap.add(b)

    def create(self, name, dataless):
        self.intervals[-1].closed_by = name
        self.intervals.append(Interval())
        self.names.append(name)
        if not dataless:
            self.snaps[name] = [bytes(self.vol), set()]

    def convert(self, name):
        self.snaps.pop(name, None)

    def delete(self, name):
        i = next(k for k, iv in enumerate(self.intervals) if iv.closed_by == name)
        src, dst = self.intervals[i], self.intervals[i + 1]
        dst.zmap = (dst.zmap & dst.bmap) | (src.zmap - dst.bmap)
        dst.cmap |= src.cmap
        dst.bmap |= src.bmap
        del self.intervals[i]
        self.names.remove(name)
        self.snaps.pop(name, None)
