"""The dvmm core: the process that owns /dev/kvm, the vCPUs and guest RAM,
and the ``dvmm`` command line that starts every dvmm program."""
