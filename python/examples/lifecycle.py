"""The capsule lifecycle example of issue #11, as written there, apart from the template:
``CAPSULE_TEST_TEMPLATE`` names it ("minimal" where Linux boots, i.e. with hardware
virtualization; "probe", the default here, on any KVM host). Run by
``tests/test_example.py``; by hand: ``CAPSULE_TEST_TEMPLATE=minimal python lifecycle.py``.
"""

import os

from capsule import Capsule

TEMPLATE = os.environ.get("CAPSULE_TEST_TEMPLATE", "probe")

capsule = Capsule(template=TEMPLATE, timeout=120, wait=True)
print(capsule.capsule_id)          # "cl-abc123"
print(capsule.is_running())        # True
capsule.commands.run("echo train")
capsule.pause()
info = capsule.get_info()
print(info.status)                 # "paused"
capsule.resume()
capsule.wait_ready()
capsule.commands.run("echo done")
capsule.destroy()
