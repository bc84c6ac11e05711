// vmigrate test extension, compiled INTO a private copy of govmomi 0.24.2's
// simulator package by ../build.sh (never into /usr/share/gocode).
//
// govmomi 0.24.2's simulator has no VirtualMachine.ExportVm; this adds one.
// The lease it returns has one device URL per virtual disk, named disk-N.vmdk
// like a real vCenter, and served by ServeNFC (nfc.go) straight from the
// datastore file that backs the disk: the bytes a client downloads are exactly
// the bytes in that file (no streamOptimized conversion).

package simulator

import (
	"fmt"
	"net/url"
	"path"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// NfcSslThumbprint is put in every ExportVm device URL's sslThumbprint, as a
// real vCenter puts the ESXi host's certificate SHA-1 there. Set by main.
var NfcSslThumbprint string

// ExportVm implements VirtualMachine.ExportVm.
func (vm *VirtualMachine) ExportVm(ctx *Context, req *types.ExportVm) soap.HasFault {
	body := new(methods.ExportVmBody)

	// A real vCenter refuses to export a running VM.
	if vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn {
		body.Fault_ = Fault("VM must be powered off to export", &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOff,
			ExistingState:  vm.Runtime.PowerState,
		})
		return body
	}

	lease := NewHttpNfcLease(ctx, vm.Self)
	lease.Info.Lease = lease.Self

	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	for i, d := range devices.SelectByType((*types.VirtualDisk)(nil)) {
		disk := d.(*types.VirtualDisk)
		backing, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo)
		if !ok {
			continue // e.g. RDM without a file: nothing to serve
		}
		var file object.DatastorePath
		file.FromString(backing.GetVirtualDeviceFileBackingInfo().FileName)
		ds := vm.findDatastore(file.Datastore)

		name := fmt.Sprintf("disk-%d.vmdk", i)
		lease.files[name] = path.Join(ds.Info.GetDatastoreInfo().Url, file.Path)
		lease.Info.TotalDiskCapacityInKB += disk.CapacityInKB

		lease.Info.DeviceUrl = append(lease.Info.DeviceUrl, types.HttpNfcLeaseDeviceUrl{
			// Key names the disk like vCenter does: "/vm-42/VirtualLsiLogicController0:0"
			Key:           fmt.Sprintf("/%s/%s", vm.Self.Value, controllerSlot(devices, disk)),
			Url:           (&url.URL{Scheme: "https", Host: "*", Path: nfcPrefix + path.Join(lease.Self.Value, name)}).String(),
			SslThumbprint: NfcSslThumbprint,
			Disk:          types.NewBool(true),
			TargetId:      name,
		})
	}

	body.Res = &types.ExportVmResponse{Returnval: lease.Self}
	return body
}

// controllerSlot returns "<ControllerType><bus>:<unit>" for a disk.
func controllerSlot(devices object.VirtualDeviceList, disk *types.VirtualDisk) string {
	unit := int32(0)
	if disk.UnitNumber != nil {
		unit = *disk.UnitNumber
	}
	c, ok := devices.FindByKey(disk.ControllerKey).(types.BaseVirtualController)
	if !ok {
		return fmt.Sprintf("VirtualDisk:%d", unit)
	}
	kind := strings.TrimPrefix(fmt.Sprintf("%T", c), "*types.")
	return fmt.Sprintf("%s%d:%d", kind, c.GetVirtualController().BusNumber, unit)
}
