"""vmigrate: migrate virtual machines and their disks between hypervisors and clouds."""
