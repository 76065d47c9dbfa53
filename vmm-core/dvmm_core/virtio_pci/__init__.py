"""virtio-pci (modern) transport for vhost-user devices: common config, MSI-X, the PCI function."""
