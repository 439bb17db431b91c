// Verifies a key-based Sigstore bundle with sigstore-js (@sigstore/bundle + @sigstore/verify), offline:
// the trusted material is the one public key given (as `cosign --key`); no tlog/CT/TSA thresholds (none exist).
const fs = require('fs');
const { bundleFromJSON } = require('@sigstore/bundle');
const { Verifier, toSignedEntity, toTrustMaterial } = require('@sigstore/verify');
const { crypto } = require('@sigstore/core');
const [bundlePath, keyPath] = process.argv.slice(2);
try {
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(bundlePath, 'utf8')));
  const hint = bundle.verificationMaterial.content.publicKey.hint;
  const publicKey = crypto.createPublicKey(fs.readFileSync(keyPath, 'utf8'));
  const keys = () => ({ publicKey, validFor: () => true }); // the key given, whatever the (unauthenticated) hint says
  const root = { tlogs: [], ctlogs: [], certificateAuthorities: [], timestampAuthorities: [] };
  const verifier = new Verifier(toTrustMaterial(root, keys), { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
  verifier.verify(toSignedEntity(bundle));
  console.log(`OK: ${bundlePath} verified by @sigstore/verify with ${keyPath} (hint ${hint.slice(0, 16)}..., payloadType ${bundle.content.dsseEnvelope.payloadType})`);
} catch (error) {
  console.log(`FAILED: ${bundlePath}: ${error.code || error.name}: ${error.message}`);
  process.exit(1);
}
