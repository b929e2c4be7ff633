// Compiles contracts/*.sol with the pinned npm `solc` and writes one artifact per
// contract to contracts/artifacts/ (ABI, creation and runtime bytecode), the format the
// Rust `sol!` bindings read. `--check` compares instead of writing and exits 1 when an
// artifact is stale. Run through scripts/contracts, which finds the installed solc.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const here = __dirname;
const outDir = path.join(here, 'artifacts');
const check = process.argv.includes('--check');
const sources = {};
for (const file of fs.readdirSync(here).filter((f) => f.endsWith('.sol')).sort()) {
  sources[file] = { content: fs.readFileSync(path.join(here, file), 'utf8') };
}
const settings = {
  optimizer: { enabled: true, runs: 200 },
  // Cancun: what current rollups run; no opcode newer than that.
  evmVersion: 'cancun',
  // No metadata hash: the bytecode depends on the source alone, so artifacts compare exactly.
  metadata: { bytecodeHash: 'none' },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};
const output = JSON.parse(solc.compile(JSON.stringify({ language: 'Solidity', sources, settings })));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(2);

let stale = [];
for (const file of Object.keys(output.contracts)) {
  for (const [name, contract] of Object.entries(output.contracts[file])) {
    const artifact = {
      contractName: name,
      sourceName: `contracts/${file}`,
      compiler: `solc ${solc.version()}`,
      settings: { optimizerRuns: settings.optimizer.runs, evmVersion: settings.evmVersion },
      abi: contract.abi,
      bytecode: '0x' + contract.evm.bytecode.object,
      deployedBytecode: '0x' + contract.evm.deployedBytecode.object,
    };
    if (!artifact.bytecode || artifact.bytecode === '0x') continue; // interfaces
    const target = path.join(outDir, `${name}.json`);
    const text = JSON.stringify(artifact, null, 2) + '\n';
    if (check) {
      const current = fs.existsSync(target) ? fs.readFileSync(target, 'utf8') : '';
      if (current !== text) stale.push(path.relative(path.dirname(here), target));
    } else {
      fs.mkdirSync(outDir, { recursive: true });
      fs.writeFileSync(target, text);
      console.log(`wrote ${path.relative(path.dirname(here), target)} (${(artifact.deployedBytecode.length - 2) / 2} bytes deployed)`);
    }
  }
}
if (stale.length) {
  console.error(`stale contract artifacts: ${stale.join(', ')}; run scripts/contracts and commit the result`);
  process.exit(1);
}
if (check) console.log('contract artifacts are up to date');
