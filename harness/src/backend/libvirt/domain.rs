//! The domain XML hvbench hands libvirt: a transient q35 domain with direct kernel boot
//! (the PVH ELF as `<kernel>`, which QEMU boots through its PVH option ROM), the serial
//! console in a file hvbench follows, and the exit device added through
//! `<qemu:commandline>` (libvirt has no element for isa-debug-exit).
//!
//! The machine is the one hvbench's own q35 rung starts (`--backend qemu --qemu-machine
//! q35`), so the ladder's last step isolates the management stack: ACPI on (QEMU's
//! default; without `<acpi/>` libvirt passes `-no-acpi`) and no USB controller (without
//! `model='none'` libvirt adds a qemu-xhci behind two pcie-root-ports, which the guest's
//! firmware then enumerates at kvm_pvm's emulated CPL0 speed).

use std::fmt::Write as _;
use std::path::Path;

use workloads::abi::EXIT_PORT;

/// Everything one domain is made of.
#[derive(Clone, Debug)]
pub struct DomainSpec<'a> {
    pub name: &'a str,
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The file the guest's COM1 writes to (hvbench follows it).
    pub console_file: &'a Path,
    /// CPU features QEMU must add (`require`) or leave out (`disable`) on top of the host's.
    pub cpu_features: &'a [(CpuPolicy, &'a str)],
    /// The owner line of the run that made it (`backend::stale::Owner`), for its metadata.
    pub owner: Option<&'a str>,
}

/// A `<feature policy=...>` of the domain's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPolicy {
    Require,
    Disable,
}

impl CpuPolicy {
    const fn word(self) -> &'static str {
        match self {
            CpuPolicy::Require => "require",
            CpuPolicy::Disable => "disable",
        }
    }
}

/// Escapes text for an XML attribute or element.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

impl DomainSpec<'_> {
    /// The XML `virsh create` is given.
    pub fn render(&self) -> String {
        let mut cpu = String::new();
        for (policy, name) in self.cpu_features {
            let _ = write!(
                cpu,
                "\n    <feature policy='{}' name='{}'/>",
                policy.word(),
                escape(name)
            );
        }
        format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
{metadata}  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='off'>{cpu}
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='isa-debug-exit,iobase={exit:#x},iosize=0x04'/>
  </qemu:commandline>
</domain>
",
            name = escape(self.name),
            metadata = super::stale::metadata_element(self.owner),
            memory = self.memory_mib,
            vcpus = self.vcpus,
            kernel = escape(&self.kernel.display().to_string()),
            cmdline = escape(self.cmdline),
            console = escape(&self.console_file.display().to_string()),
            exit = EXIT_PORT,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_is_q35_with_the_kernel_console_and_exit_device() {
        let spec = DomainSpec {
            name: "hvbench-1-2",
            kernel: Path::new("/tmp/d/guest.elf"),
            cmdline: "hvbench run=cpu.idle samples=3",
            memory_mib: 256,
            vcpus: 2,
            console_file: Path::new("/tmp/d/console.log"),
            cpu_features: &[(CpuPolicy::Require, "invtsc")],
            owner: Some("hvbench-owner-1 x 1 2"),
        };
        let xml = spec.render();
        for part in [
            "<name>hvbench-1-2</name>",
            "machine='q35'",
            "<kernel>/tmp/d/guest.elf</kernel>",
            "<cmdline>hvbench run=cpu.idle samples=3</cmdline>",
            "<memory unit='MiB'>256</memory>",
            "<vcpu>2</vcpu>",
            "<serial type='file'>\n      <source path='/tmp/d/console.log'/>",
            "<feature policy='require' name='invtsc'/>",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "<on_reboot>destroy</on_reboot>",
            "<memballoon model='none'/>",
            "<acpi/>",
            "<controller type='usb' model='none'/>",
            ">hvbench-owner-1 x 1 2</hvbench:owner>",
        ] {
            assert!(xml.contains(part), "{part} missing from\n{xml}");
        }
    }

    #[test]
    fn text_cannot_break_out_of_its_element() {
        let spec = DomainSpec {
            name: "a'<b>&\"",
            kernel: Path::new("/k"),
            cmdline: "x</cmdline><devices>",
            memory_mib: 64,
            vcpus: 1,
            console_file: Path::new("/s"),
            cpu_features: &[],
            owner: None,
        };
        let xml = spec.render();
        assert!(xml.contains("<name>a&apos;&lt;b&gt;&amp;&quot;</name>"));
        assert!(xml.contains("<cmdline>x&lt;/cmdline&gt;&lt;devices&gt;</cmdline>"));
        assert_eq!(xml.matches("<devices>").count(), 1);
    }
}
