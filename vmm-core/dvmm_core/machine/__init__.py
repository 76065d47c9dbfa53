"""The PC machine model of the dvmm core: I/O buses, platform devices
(serial, CMOS, i8042, reset, fw_cfg), the PCI host bridge and the e820 map."""
