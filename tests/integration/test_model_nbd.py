"""The model-based test of tests/unit/test_model.py, driven through the real
server: NBD writes, zeroes and trims (libnbd), snappoints over the control
socket, snapshot images read from the snap/NAME exports."""
import random

import nbd

import pytest

from tests.conftest import prepl
from tests.model import Model
from tests.unit.test_model import BLOCK, REGION, SIZE, check, random_step

pytestmark = pytest.mark.slow


class OverNBD:
    def __init__(self, srv):
        self.srv = srv
        self.h = srv.connect()

    def write(self, off, data):
        self.h.pwrite(data, off)

    def zero(self, off, n, trim=False):
        if trim:
            self.h.trim(n, off)
        else:
            self.h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if off % 2 else 0)

    def create(self, name, dataless):
        self.srv.ctl("snappoint_create", name=name, dataless=dataless)

    def convert(self, name):
        self.srv.ctl("snappoint_convert", name=name)

    def delete(self, name):
        self.srv.ctl("snappoint_delete", name=name)

    def maps(self):
        return self.srv.ctl("maps")

    def volume(self):
        return self.h.pread(SIZE, 0)

    def snapshot(self, name):
        s = self.srv.connect(f"snap/{name}")
        try:
            return s.pread(SIZE, 0)
        finally:
            s.shutdown()


def test_model_over_nbd(tmp_path, make_server):
    cases = 0
    for seed in range(8):
        rnd = random.Random(1000 + seed)
        data = rnd.randbytes(SIZE)
        d = tmp_path / str(seed)
        d.mkdir()
        (d / "vol.img").write_bytes(data)
        prepl("init", d / "st", "--volume", d / "vol.img", "--region-size", str(REGION),
              "--block-size", str(BLOCK))
        srv = make_server(d / "st").start()
        sut, model = OverNBD(srv), Model(data, REGION, BLOCK)
        counter = [0]
        for _ in range(20):
            random_step(rnd, sut, model, counter)
            check(sut, model)
            cases += 1
        srv.stop()
    assert cases == 160
