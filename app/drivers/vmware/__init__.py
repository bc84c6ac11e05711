"""The VMware platform: vCenter (kind ``vmware``) and standalone ESXi hosts (``esxi``).

Modules: :mod:`.spec` (the declaration), :mod:`.models` (settings and placement),
:mod:`.driver` (session, power, snapshots on the kit), :mod:`.inventory` (look-ups
and placement), :mod:`.transfer` (export and import through leases), :mod:`.lease`
(lease keep-alive), :mod:`.ovf` (OVF descriptor), :mod:`.errors` (fault table).
Importing the package imports no SDK: the spec builds the driver lazily.
"""
